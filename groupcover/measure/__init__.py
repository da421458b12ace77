"""Measuring tools outside the code they measure: `wire_compare` (the default TCP wire against
torch-rpc, one run), `transport_micro` (what one worker call costs on the wire) and
`integrity_escape` (the smallest one-element change of a worker's result the integrity check
misses, per mode)."""
