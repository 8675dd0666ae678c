"""Token-axis methods (which positions each KV head keeps) and the scoring, budget and selection helpers they
share (``scoring``)."""
