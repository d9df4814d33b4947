"""Records: frame metadata, localizations and tracks, defined once."""
