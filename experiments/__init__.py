"""Experiments: variants of the loop, and the baseline with no loop, run on a prompt set over
seeds and compared pair by pair with scorers that are not the loop's judge.

spec.py: the experiment file (TOML) as pydantic models, resolved into prompts and one config
per column; prompt_sets.py: local files and the named sets (shapes, DrawBench, PartiPrompts,
GenAI-Bench, TIFA v1.0, HPSv2); runner.py: the runs (the batch runner) and their scores;
training.py: an effect study's [train] stages (collect, export, train LoRAs: their columns);
stats.py: bootstrap intervals and paired tests; results.py: the tables; plots.py: inline SVG;
report.py: report.json, report.md and index.html, and the comparison of two experiments.
"""
