"""Measuring tools for the wire, outside the wire itself: `wire_compare` (the default TCP wire
against torch-rpc, one run) and `transport_micro` (what one worker call costs on the wire)."""
