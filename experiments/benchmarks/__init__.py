"""Speed benchmarks (``python -m experiments.benchmarks.<name>``): each prints ratios against a
reference measured in the same process, never absolute wall-clock claims."""
