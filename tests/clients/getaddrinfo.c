/* getaddrinfo(name) with the C library it is built against (musl in the autopath
 * test): one address per line, exit status 1 when the name is not found. */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 2;
    }
    struct addrinfo hints, *found;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    int err = getaddrinfo(argv[1], NULL, &hints, &found);
    if (err != 0) {
        fprintf(stderr, "%s: %s\n", argv[1], gai_strerror(err));
        return 1;
    }
    for (struct addrinfo *a = found; a != NULL; a = a->ai_next) {
        char text[INET6_ADDRSTRLEN];
        const void *addr = a->ai_family == AF_INET
            ? (const void *)&((struct sockaddr_in *)a->ai_addr)->sin_addr
            : (const void *)&((struct sockaddr_in6 *)a->ai_addr)->sin6_addr;
        if (inet_ntop(a->ai_family, addr, text, sizeof text) != NULL) {
            puts(text);
        }
    }
    freeaddrinfo(found);
    return 0;
}
