"""learnmesh tests: real servers on real ports, real channels."""
