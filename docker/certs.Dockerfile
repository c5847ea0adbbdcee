# One-shot certificate generation (CA, SuperLink certificate, one ECDSA key pair per SuperNode)
# with the same script the local deployment uses (mounted at /deploy by docker/compose.tls.yaml).
# BASE_IMAGE: alpine (default, bash/openssl/ssh-keygen added from its package index) or any image
# that already has them, e.g. the offline Debian base of `make docker-base`.
ARG BASE_IMAGE=alpine:3.20
FROM ${BASE_IMAGE}
RUN if ! (command -v bash && command -v openssl && command -v ssh-keygen) >/dev/null 2>&1; then \
      apk add --no-cache bash openssl openssh-keygen; \
    fi
ENTRYPOINT ["bash", "/deploy/make_certs.sh"]
