"""Packages of the distribution: the code at the top, and protoc's output from generated/.

protoc names modules after proto paths (``learnmesh.auth.v1.auth_pb2``), so the generated
areas join the runtime's ``learnmesh`` package; package_dir maps them to generated/ so that
installed and editable installs import them with no sys.path edits. Metadata is in
pyproject.toml.
"""

from setuptools import find_namespace_packages, find_packages, setup

own = find_packages(include=["learnmesh*", "services*", "interceptors*", "bridge*"])
generated = find_namespace_packages("generated", include=["learnmesh.*", "buf", "buf.*"])

setup(
    packages=own + generated,
    package_dir={name: "generated/" + name.replace(".", "/") for name in generated},
)
