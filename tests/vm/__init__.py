"""Running tests inside a QEMU guest whose kernel has what the host's may lack."""
