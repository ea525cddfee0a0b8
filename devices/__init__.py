"""Device profiles as data: what a target runs, so the optimizer and the runtime agree."""

from edgerun.devices.profile import DeviceProfile, list_profiles, load_profile

__all__ = ["DeviceProfile", "list_profiles", "load_profile"]
