"""fpc-ray tune: a Ray Tune search (Optuna TPE + ASHA) whose every trial is ``fpc-ray train``."""
