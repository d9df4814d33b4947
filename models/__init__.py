"""Everything that turns pixels into 3D tracks: networks, training, localizer, tracker, metrics."""
