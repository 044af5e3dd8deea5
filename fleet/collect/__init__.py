"""Talking to hosts: the SSH transport (`transport`, the only paramiko import in fleet), the
collection command, and the pure parsers of its output."""
