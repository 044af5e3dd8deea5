"""One module per command's workflow: what `fleet COMMAND` does, between the CLI that parses its
arguments (fleet/cli.py) and the output that prints its result (fleet/output/).

A workflow takes a frozen options object (base.py: `Common`, `Scope`, and its command's own)
and a `Reporter`, and returns plain data: it never prints, never reads argparse's namespace,
and speaks to the person running fleet only through the reporter (progress on stderr, a
question, the plan to review).  `observe` and `check` are the steps the others share.
"""
