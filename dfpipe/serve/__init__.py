"""Serving the stage-5 ensemble: HTTP API + web page (:mod:`.api`), folder scans (:mod:`.scan`),
occlusion heatmaps (:mod:`.explain`) and what they share (:mod:`.service`). The ``dfpipe`` console
script (:mod:`dfpipe.cli`) drives them. Every score comes from :class:`dfpipe.ensemble_predict.Ensemble`."""
