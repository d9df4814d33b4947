"""Physics of the simulated microscope and the training-data synthesizer.

Nothing here touches hardware or the service; `focaltrack.drivers` and
`focaltrack.models` build on it.
"""
