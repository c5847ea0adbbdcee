# One-shot certificate generation (CA, SuperLink certificate, one ECDSA key pair per SuperNode)
# with the same script the local deployment uses (mounted at /deploy by docker/compose.tls.yaml).
FROM alpine:3.20
RUN apk add --no-cache bash openssl openssh-keygen
ENTRYPOINT ["bash", "/deploy/make_certs.sh"]
