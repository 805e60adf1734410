"""Tests that pin the numeric core exactly (evaluation statistics, the paired design, schedules, samplers, resume
state): written against the mutants `make mutation` found alive."""
