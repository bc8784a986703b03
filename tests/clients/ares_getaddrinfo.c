/* ares_getaddrinfo(name) with c-ares, which reads /etc/resolv.conf (search, ndots)
 * itself: one address per line, exit status 1 when the name is not found. */
#include <arpa/inet.h>
#include <ares.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>

static void done(void *arg, int status, int timeouts, struct ares_addrinfo *result) {
    int *failed = arg;
    (void)timeouts;
    if (status != ARES_SUCCESS) {
        fprintf(stderr, "%s\n", ares_strerror(status));
        *failed = 1;
        return;
    }
    for (struct ares_addrinfo_node *n = result->nodes; n != NULL; n = n->ai_next) {
        char text[INET6_ADDRSTRLEN];
        const void *addr = n->ai_family == AF_INET
            ? (const void *)&((struct sockaddr_in *)n->ai_addr)->sin_addr
            : (const void *)&((struct sockaddr_in6 *)n->ai_addr)->sin6_addr;
        if (inet_ntop(n->ai_family, addr, text, sizeof text) != NULL) {
            puts(text);
        }
    }
    ares_freeaddrinfo(result);
    *failed = 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s NAME\n", argv[0]);
        return 2;
    }
    ares_channel channel;
    if (ares_library_init(ARES_LIB_INIT_ALL) != ARES_SUCCESS || ares_init(&channel) != ARES_SUCCESS) {
        fprintf(stderr, "c-ares did not start\n");
        return 2;
    }
    struct ares_addrinfo_hints hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    int failed = -1;
    ares_getaddrinfo(channel, argv[1], NULL, &hints, done, &failed);
    for (;;) {
        fd_set readers, writers;
        FD_ZERO(&readers);
        FD_ZERO(&writers);
        int nfds = ares_fds(channel, &readers, &writers);
        if (nfds == 0) {
            break;
        }
        struct timeval wait, *waitp = ares_timeout(channel, NULL, &wait);
        select(nfds, &readers, &writers, NULL, waitp);
        ares_process(channel, &readers, &writers);
    }
    ares_destroy(channel);
    ares_library_cleanup();
    return failed != 0;
}
