"""The drift monitor: triggers a retrain when a live student's agreement drops, its traffic shifts to intents
it never saw, or its fallback rate rises (``rules`` decides, ``queries`` reads, ``service`` runs)."""
