"""The device side of fleet updates: the OTA agent, its A/B slots and the wire it speaks."""
