"""Evaluation the way the papers did it: few-shot prompting, BIG-bench, HumanEval, chain of thought."""
