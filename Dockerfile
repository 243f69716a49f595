FROM python:3.11-slim
WORKDIR /needle
COPY . .
# A CUDA build of torch for GPU workers; the web server only needs the CPU parts.
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 && pip install --no-cache-dir -c constraints.txt -e .
EXPOSE 8000
CMD ["needle", "serve", "--host", "0.0.0.0", "--port", "8000"]
