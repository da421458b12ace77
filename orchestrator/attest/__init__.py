"""The key owner's side of attestation: evidence verifiers (SEV-SNP, TDX), the broker's policy, and
a key broker speaking the Confidential Containers KBS protocol (RCAR). Verification never runs in
the guest being verified; the guest side is `groupcover.keyrelease`."""
