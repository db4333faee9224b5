from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
OTEL = ["opentelemetry-api>=1.30", "opentelemetry-sdk>=1.30", "opentelemetry-exporter-otlp-proto-http>=1.30"]


def version():
    for line in (HERE / "tornado_proxy" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("no __version__")


setup(
    name="tornado-proxy",
    version=version(),
    description="An OpenAI-compatible LLM gateway on Tornado, drop-in for the LiteLLM proxy config",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tornado_proxy", "tornado_proxy.*"]),
    package_data={"tornado_proxy": ["default_routes.yaml", "prices.json"]},
    data_files=[
        ("share/tornado-proxy/schemas", [str(p.relative_to(HERE)) for p in sorted((HERE / "schemas").glob("*.json"))]),
        ("share/tornado-proxy/sql", [str(p.relative_to(HERE)) for p in sorted((HERE / "sql").glob("*.sql"))]),
    ],
    install_requires=[
        "tornado>=6.6,<6.7",  # httpserver.py and upstream.py lean on its internals (tests guard them)
        "pycurl>=7.45.3",
        "aiopg>=1.4",
        "psycopg2-binary>=2.9.9",
        "PyYAML>=6.0.1",
        "jsonschema>=4.21",
        "click>=8.1",
        "orjson>=3.10",
        "prometheus_client>=0.20",
        "fastjsonschema>=2.19",
        "cryptography>=42",
        "redis>=5",  # rate limits shared across instances (ratelimit.py), as LiteLLM shares them
        "multipart>=1.2",  # incremental multipart/form-data parsing of audio uploads (upload.py)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-asyncio>=0.24",
            "pytest-timeout>=2.3",
            "openai>=1.40",
            "anthropic>=0.40",
            "trustme>=1.1",
            *OTEL,
            "kubernetes-validate>=1.30",  # tests/test_deploy_files.py: the manifests against the Kubernetes schemas, offline
        ],
        # OpenTelemetry tracing (tracing.py), imported only when tracing is configured
        "otel": OTEL,
    },
    entry_points={"console_scripts": ["proxyctl=tornado_proxy.cli:main"]},
)
