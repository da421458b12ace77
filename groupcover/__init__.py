"""GroupCover: obfuscated offload of linear layers from a trusted master to an untrusted worker."""
