"""gcvm orchestrator: confidential VMs (TDX, SEV-SNP, plain KVM/TCG) for GroupCover.

Nothing here imports the framework (`groupcover`): the two meet only at the command
`python -m groupcover launch ...` run inside each guest, and at the JSON it writes.
"""
