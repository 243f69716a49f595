"""Needle's compute side: model loading, neuron access, stages run as jobs, results stored through app/."""
