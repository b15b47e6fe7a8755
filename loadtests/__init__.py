"""Load generator and benchmark for KServe V2 HTTP inference servers (modelserve, Triton).

    python -m loadtests --url 127.0.0.1:8000 --model cnn --protocol binary --concurrency 1,8,32 --requests 2000
    python -m loadtests.bench --output bench_results/
"""
