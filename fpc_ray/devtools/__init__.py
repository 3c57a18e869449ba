"""Development helpers: the embedded S3 server that tests and the demo run on loopback."""
