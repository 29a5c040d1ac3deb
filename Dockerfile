# One image for `tokenrelay api` and `tokenrelay worker`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tokenrelay ./tokenrelay
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    TOKENRELAY_REDIS_URL=redis://redis:6379/0
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home tokenrelay
USER tokenrelay
EXPOSE 2024
# Your graphs: build FROM this image, `pip install` your package, set TOKENRELAY_GRAPHS.
CMD ["tokenrelay", "api", "--host", "0.0.0.0", "--port", "2024"]
