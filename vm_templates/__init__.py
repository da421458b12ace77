"""Package data: vm_templates."""
