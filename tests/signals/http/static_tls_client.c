/* An HTTPS client linked statically with OpenSSL (libssl.a): its SSL_* functions
 * live in the binary itself, which the agent is told with --tls-lib. Prints the
 * status line of one GET. Built by tests/signals/http/test_http_kernel.py. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[2])) };
	char req[256], buf[4096];
	int fd = socket(AF_INET, SOCK_STREAM, 0), n;
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	SSL *ssl;

	inet_pton(AF_INET, argv[1], &sa.sin_addr);
	if (connect(fd, (void *)&sa, sizeof(sa)))
		return 2;
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	if (SSL_connect(ssl) != 1)
		return 3;
	snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", argv[3]);
	SSL_write(ssl, req, strlen(req));
	n = SSL_read(ssl, buf, sizeof(buf) - 1);
	if (n <= 0)
		return 4;
	buf[n] = 0;
	*strchr(buf, '\r') = 0;
	printf("%s\n", buf);
	while (SSL_read(ssl, buf, sizeof(buf)) > 0)
		;
	SSL_shutdown(ssl);
	close(fd);
	return 0;
}
