"""One module per kind of resource fleet handles (base.py says what each provides); the ordered
list of them, and the lookup by action, is registry.py."""
