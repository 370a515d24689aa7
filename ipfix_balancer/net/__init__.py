"""The data plane's doing half: each class owns one kind of file descriptor and drives core objects."""
