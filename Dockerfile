# epp container image: `epp serve` on the reference ports.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin epp
USER 65532
# ext_proc gRPC, gRPC health, Prometheus
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
CMD ["serve", "--pool-file", "/etc/epp/pool.yaml"]
