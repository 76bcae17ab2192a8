"""Outside the stages: the dataset generators (``demo_data``, ``real_data``) and the command-line
tools that use the pipeline's files (``baseline``, ``compare_runs``). No stage imports them."""
