"""Compression methods, one small file each. Importing this package registers them all."""
