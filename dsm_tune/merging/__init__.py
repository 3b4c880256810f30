"""Runtime DSM merger for timm ViTs (torch + timm only)."""
