"""Serving a trained checkpoint with the parser it was trained with (`vllm serve` + a plugin).

python -m toolrl.serve RUN_DIR/checkpoint --dtype float32      # see docs/serving.md
python -m pytest tests/unit/test_serve_plugin.py
"""
