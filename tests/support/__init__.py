"""What the tests share: doubles of mesh services and the server they run on, the one
server-in-a-subprocess helper, the one test certificate authority, reading rich error
details, and the accounts, audit rows and mail of a running mesh."""
