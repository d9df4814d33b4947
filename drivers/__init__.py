"""The only code that touches a microscope: one driver over an MMCore-like core."""
