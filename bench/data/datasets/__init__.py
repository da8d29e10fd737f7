"""The built-in data sets: every module here registers one (bench/data/registry.py).

A new data set is one module (or package folder) here, decorated with `register_dataset`, plus
an experiment YAML in configs/experiments/ that selects it with `data.name`.
"""
