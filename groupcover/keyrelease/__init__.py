"""The guest side of attestation-gated key release: hardware evidence (configfs-tsm,
/dev/sev-guest) and a client of the key broker's KBS protocol. Verification is the broker's
(`orchestrator.attest`); nothing here decides whether evidence is good."""

from groupcover.keyrelease.evidence import (
    ConfigfsTsm,
    EvidenceError,
    EvidenceSource,
    NoEvidence,
    NoEvidenceProvider,
    SevGuestDevice,
    detect,
)
from groupcover.keyrelease.kbs import (
    INSECURE_LABEL,
    UNAUTHENTICATED_LABEL,
    BrokerNotAuthenticated,
    KbsClient,
    KeyReleaseError,
    KeyReleaseRefused,
    Release,
    report_data_for,
)

__all__ = [
    "INSECURE_LABEL",
    "UNAUTHENTICATED_LABEL",
    "BrokerNotAuthenticated",
    "ConfigfsTsm",
    "EvidenceError",
    "EvidenceSource",
    "KbsClient",
    "KeyReleaseError",
    "KeyReleaseRefused",
    "NoEvidence",
    "NoEvidenceProvider",
    "Release",
    "SevGuestDevice",
    "detect",
    "report_data_for",
]
