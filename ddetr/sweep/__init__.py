"""Ray Tune sweeps of ddetr trainings: search-space files, ASHA that survives a restore, the results folder.

    ddetr tune --preset tiny --data DIR --space tune/spaces/tiny.yaml --samples 8    (python tune/sweep.py ...)

`driver` runs the sweep, `space` reads search-space YAML files, `asha` keeps ASHA's rungs across a continued
sweep, `report` writes the table, the plot and the best config.
"""
