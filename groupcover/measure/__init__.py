"""Measuring tools outside the code they measure: `wire_compare` (the default TCP wire against
torch-rpc, one run), `transport_micro` (what one worker call costs on the wire),
`integrity_escape` (the smallest one-element change of a worker's result the integrity check
misses, per mode) and `precision` (the worker's float64 products against float32 on the masked
modes' layers, and the error a float32 worker would make of a masked product)."""
