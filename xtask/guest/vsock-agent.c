/*
 * vsock-agent: the guest side of `cargo xtask e2e`, `demo` and `bench-e2e`.
 *
 * Runs as a service in the test guest. It listens for control connections on vsock
 * STREAM port CONTROL_PORT; the host drives it one line at a time:
 *
 *   SINK <port> <nconn>             listen on <port>, answer "READY", accept <nconn>
 *                                   stream connections at once, verify each
 *                                   "[u64 len][len bytes][u64 checksum]" transfer, answer
 *                                   "DONE <ok> <bytes> <xor of checksums> <usec>"
 *   SOURCE <port> <nconn> <bytes>   connect <nconn> times at once to the host (CID 2),
 *                                   send one transfer on each (seed = port + i), answer
 *                                   "DONE <ok> <bytes> <xor of checksums> <usec>"
 *   SEQ <port> <count>              connect a SEQPACKET socket to the host, send <count>
 *                                   messages of varying sizes, expect each echoed back as
 *                                   one message of the same size and bytes, answer
 *                                   "DONE <ok> <bytes> 0 <usec>"
 *   REFUSED <port>                  connect to a host port nobody listens on, answer
 *                                   "DONE <errno name>"
 *   ECHO <port>                     listen on <port>, answer "READY", accept one
 *                                   connection and echo it until EOF, answer "DONE"
 *   PING <port> <count> <size>      connect to the host, send <size> bytes and wait for
 *                                   them to come back, <count> times, answer
 *                                   "DONE <count> <average nsec> <median nsec> <p99 nsec>"
 *   SHELL <port>                    listen on <port>, answer "READY", accept one
 *                                   connection and run /bin/sh on it
 *
 * Any failure answers "ERR <what>". Every result is also printed on the console.
 * Each control connection runs in its own thread, so commands of several connections
 * run at once (their buffers are per thread).
 * Build: gcc -static -O2 -pthread -o vsock-agent vsock-agent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define CONTROL_PORT 999
#define HOST_CID 2
#define MAX_CONN 64
#define BUF_SIZE (256 * 1024)
#define IO_TIMEOUT_SEC 600

/* The stream checksum, also implemented by the xtask: 64-bit little-endian words, the
 * tail zero-padded. */
struct sum {
    uint64_t h;
    uint64_t carry;
    unsigned carry_len;
    uint64_t total;
};

static void sum_init(struct sum *s) {
    s->h = 0xcbf29ce484222325ULL;
    s->carry = 0;
    s->carry_len = 0;
    s->total = 0;
}

static inline uint64_t mix(uint64_t h, uint64_t w) {
    h ^= w;
    h *= 0x100000001b3ULL;
    return (h << 29) | (h >> 35);
}

static void sum_update(struct sum *s, const uint8_t *p, size_t n) {
    s->total += n;
    while (n > 0 && s->carry_len != 0) {
        s->carry |= (uint64_t)*p << (8 * s->carry_len);
        p++;
        n--;
        if (++s->carry_len == 8) {
            s->h = mix(s->h, s->carry);
            s->carry = 0;
            s->carry_len = 0;
        }
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        s->h = mix(s->h, w);
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        s->carry |= (uint64_t)*p << (8 * s->carry_len);
        s->carry_len++;
        p++;
        n--;
    }
}

static uint64_t sum_final(const struct sum *s) {
    uint64_t h = s->h;
    if (s->carry_len != 0)
        h = mix(h, s->carry);
    return mix(h, s->total);
}

/* The data generator, also implemented by the xtask: xorshift64 words. */
static void fill(uint64_t *state, uint8_t *p, size_t n) {
    uint64_t x = *state;
    for (size_t i = 0; i + 8 <= n; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(p + i, &x, 8);
    }
    *state = x;
}

static uint64_t seed_of(uint64_t port) {
    return 0x9e3779b97f4a7c15ULL ^ (port * 0x2545f4914f6cdd1dULL) ^ 1;
}

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static void say(int fd, const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    fprintf(stderr, "vsock-agent: %.*s", n, line);
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, line + off, n - off);
        if (w <= 0)
            return;
        off += w;
    }
}

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int read_all(int fd, uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void set_timeout(int fd) {
    struct timeval tv = {.tv_sec = IO_TIMEOUT_SEC, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int vsock_listen(int type, unsigned port) {
    int fd = socket(AF_VSOCK, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, MAX_CONN) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static int vsock_connect(int type, unsigned cid, unsigned port) {
    int fd = socket(AF_VSOCK, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    set_timeout(fd);
    return fd;
}

struct job {
    pthread_t thread;
    int fd;
    unsigned port;
    uint64_t bytes;
    uint64_t checksum;
    int ok;
    char why[96];
};

/* Receives one "[u64 len][len bytes][u64 checksum]" transfer and checks it. */
static void *sink_one(void *arg) {
    struct job *j = arg;
    uint8_t *buf = malloc(BUF_SIZE);
    uint64_t len, trailer;
    struct sum s;
    sum_init(&s);
    j->ok = 0;
    if (buf == NULL) {
        snprintf(j->why, sizeof(j->why), "out of memory");
        goto out;
    }
    if (read_all(j->fd, (uint8_t *)&len, 8) < 0) {
        snprintf(j->why, sizeof(j->why), "header: %s", strerror(errno));
        goto out;
    }
    uint64_t left = len;
    while (left > 0) {
        size_t want = left < BUF_SIZE ? (size_t)left : BUF_SIZE;
        ssize_t r = read(j->fd, buf, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            snprintf(j->why, sizeof(j->why), "data ended after %llu of %llu bytes: %s",
                     (unsigned long long)(len - left), (unsigned long long)len,
                     r == 0 ? "EOF" : strerror(errno));
            goto out;
        }
        sum_update(&s, buf, (size_t)r);
        left -= (uint64_t)r;
    }
    if (read_all(j->fd, (uint8_t *)&trailer, 8) < 0) {
        snprintf(j->why, sizeof(j->why), "trailer: %s", strerror(errno));
        goto out;
    }
    j->bytes = len;
    j->checksum = sum_final(&s);
    if (j->checksum != trailer) {
        snprintf(j->why, sizeof(j->why), "checksum %016llx, sender said %016llx",
                 (unsigned long long)j->checksum, (unsigned long long)trailer);
        goto out;
    }
    /* Tell the sender the transfer arrived whole. */
    if (write_all(j->fd, (const uint8_t *)&j->checksum, 8) < 0) {
        snprintf(j->why, sizeof(j->why), "ack: %s", strerror(errno));
        goto out;
    }
    j->ok = 1;
out:
    free(buf);
    close(j->fd);
    return NULL;
}

/* Sends one transfer of j->bytes generated bytes. */
static void *source_one(void *arg) {
    struct job *j = arg;
    uint8_t *buf = malloc(BUF_SIZE);
    uint64_t state = seed_of(j->port), ack = 0;
    struct sum s;
    sum_init(&s);
    j->ok = 0;
    if (buf == NULL) {
        snprintf(j->why, sizeof(j->why), "out of memory");
        goto out;
    }
    if (write_all(j->fd, (const uint8_t *)&j->bytes, 8) < 0)
        goto err;
    uint64_t left = j->bytes;
    while (left > 0) {
        size_t n = left < BUF_SIZE ? (size_t)left : BUF_SIZE;
        fill(&state, buf, n);
        sum_update(&s, buf, n);
        if (write_all(j->fd, buf, n) < 0)
            goto err;
        left -= n;
    }
    j->checksum = sum_final(&s);
    if (write_all(j->fd, (const uint8_t *)&j->checksum, 8) < 0)
        goto err;
    if (read_all(j->fd, (uint8_t *)&ack, 8) < 0) {
        snprintf(j->why, sizeof(j->why), "no ack: %s", strerror(errno));
        goto out;
    }
    if (ack != j->checksum) {
        snprintf(j->why, sizeof(j->why), "receiver checksum %016llx, sent %016llx",
                 (unsigned long long)ack, (unsigned long long)j->checksum);
        goto out;
    }
    j->ok = 1;
    goto out;
err:
    snprintf(j->why, sizeof(j->why), "send: %s", strerror(errno));
out:
    free(buf);
    close(j->fd);
    return NULL;
}

static void report(int ctl, struct job *jobs, unsigned n, uint64_t start) {
    unsigned ok = 0;
    uint64_t bytes = 0, x = 0;
    for (unsigned i = 0; i < n; i++) {
        if (jobs[i].ok) {
            ok++;
            bytes += jobs[i].bytes;
            x ^= jobs[i].checksum;
        } else {
            fprintf(stderr, "vsock-agent: connection %u (port %u): %s\n", i, jobs[i].port,
                    jobs[i].why);
        }
    }
    if (ok == n)
        say(ctl, "DONE %u %llu %016llx %llu", ok, (unsigned long long)bytes,
            (unsigned long long)x, (unsigned long long)(now_us() - start));
    else
        say(ctl, "ERR %u of %u transfers failed; first: %s", n - ok, n,
            jobs[0].ok ? "see console" : jobs[0].why);
}

static void cmd_sink(int ctl, unsigned port, unsigned n) {
    struct job jobs[MAX_CONN];
    if (n == 0 || n > MAX_CONN) {
        say(ctl, "ERR connection count %u out of 1..%u", n, MAX_CONN);
        return;
    }
    int l = vsock_listen(SOCK_STREAM, port);
    if (l < 0) {
        say(ctl, "ERR listen on port %u: %s", port, strerror(errno));
        return;
    }
    say(ctl, "READY");
    uint64_t start = now_us();
    unsigned started = 0;
    for (unsigned i = 0; i < n; i++) {
        memset(&jobs[i], 0, sizeof(jobs[i]));
        jobs[i].port = port;
        int fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            snprintf(jobs[i].why, sizeof(jobs[i].why), "accept: %s", strerror(errno));
            break;
        }
        set_timeout(fd);
        jobs[i].fd = fd;
        if (pthread_create(&jobs[i].thread, NULL, sink_one, &jobs[i]) != 0) {
            close(fd);
            snprintf(jobs[i].why, sizeof(jobs[i].why), "pthread_create failed");
            break;
        }
        started++;
    }
    close(l);
    for (unsigned i = 0; i < started; i++)
        pthread_join(jobs[i].thread, NULL);
    report(ctl, jobs, started == n ? n : started + 1, start);
}

static void cmd_source(int ctl, unsigned port, unsigned n, uint64_t bytes) {
    struct job jobs[MAX_CONN];
    if (n == 0 || n > MAX_CONN) {
        say(ctl, "ERR connection count %u out of 1..%u", n, MAX_CONN);
        return;
    }
    uint64_t start = now_us();
    unsigned started = 0;
    for (unsigned i = 0; i < n; i++) {
        memset(&jobs[i], 0, sizeof(jobs[i]));
        jobs[i].port = port + i;
        jobs[i].bytes = bytes;
        int fd = vsock_connect(SOCK_STREAM, HOST_CID, port);
        if (fd < 0) {
            snprintf(jobs[i].why, sizeof(jobs[i].why), "connect to port %u: %s", port,
                     strerror(errno));
            break;
        }
        jobs[i].fd = fd;
        if (pthread_create(&jobs[i].thread, NULL, source_one, &jobs[i]) != 0) {
            close(fd);
            snprintf(jobs[i].why, sizeof(jobs[i].why), "pthread_create failed");
            break;
        }
        started++;
    }
    for (unsigned i = 0; i < started; i++)
        pthread_join(jobs[i].thread, NULL);
    report(ctl, jobs, started == n ? n : started + 1, start);
}

static void cmd_seq(int ctl, unsigned port, unsigned count) {
    static __thread uint8_t out[65536], in[65536 + 1];
    uint64_t state = seed_of(port), bytes = 0, start = now_us();
    int fd = vsock_connect(SOCK_SEQPACKET, HOST_CID, port);
    if (fd < 0) {
        say(ctl, "ERR seqpacket connect to port %u: %s", port, strerror(errno));
        return;
    }
    for (unsigned i = 0; i < count; i++) {
        /* Sizes 1, 2, ... and some large ones, so that boundaries inside and across the
         * device's buffers are exercised. */
        size_t size = (i % 7 == 6) ? 60000 - i : 1 + (i * 37) % 3000;
        fill(&state, out, (size + 7) & ~(size_t)7);
        ssize_t w = send(fd, out, size, MSG_NOSIGNAL);
        if (w != (ssize_t)size) {
            say(ctl, "ERR seqpacket message %u: sent %zd of %zu: %s", i, w, size,
                strerror(errno));
            close(fd);
            return;
        }
        ssize_t r = recv(fd, in, sizeof(in), 0);
        if (r != (ssize_t)size || memcmp(in, out, size) != 0) {
            say(ctl, "ERR seqpacket message %u of %zu bytes came back as %zd bytes%s", i,
                size, r, r == (ssize_t)size ? " with other content" : "");
            close(fd);
            return;
        }
        bytes += size;
    }
    close(fd);
    say(ctl, "DONE %u %llu 0 %llu", count, (unsigned long long)bytes,
        (unsigned long long)(now_us() - start));
}

static void cmd_refused(int ctl, unsigned port) {
    int fd = vsock_connect(SOCK_STREAM, HOST_CID, port);
    if (fd >= 0) {
        close(fd);
        say(ctl, "DONE connected");
        return;
    }
    say(ctl, "DONE %s", errno == ECONNRESET ? "ECONNRESET" : strerror(errno));
}

static void cmd_echo(int ctl, unsigned port) {
    static __thread uint8_t buf[65536];
    int l = vsock_listen(SOCK_STREAM, port);
    if (l < 0) {
        say(ctl, "ERR listen on port %u: %s", port, strerror(errno));
        return;
    }
    say(ctl, "READY");
    int fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    close(l);
    if (fd < 0) {
        say(ctl, "ERR accept: %s", strerror(errno));
        return;
    }
    set_timeout(fd);
    for (;;) {
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || write_all(fd, buf, (size_t)r) < 0)
            break;
    }
    close(fd);
    say(ctl, "DONE");
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void cmd_ping(int ctl, unsigned port, unsigned count, unsigned size) {
    static __thread uint8_t out[4096], in[4096];
    if (size == 0 || size > sizeof(out) || count == 0) {
        say(ctl, "ERR ping size %u out of 1..%zu or count 0", size, sizeof(out));
        return;
    }
    int fd = vsock_connect(SOCK_STREAM, HOST_CID, port);
    if (fd < 0) {
        say(ctl, "ERR connect to port %u: %s", port, strerror(errno));
        return;
    }
    uint64_t *rtt = calloc(count, sizeof(*rtt));
    if (rtt == NULL) {
        say(ctl, "ERR out of memory");
        close(fd);
        return;
    }
    memset(out, 0x5a, size);
    uint64_t start = now_us();
    for (unsigned i = 0; i < count; i++) {
        uint64_t t0 = now_us();
        if (write_all(fd, out, size) < 0 || read_all(fd, in, size) < 0) {
            say(ctl, "ERR ping %u: %s", i, strerror(errno));
            close(fd);
            free(rtt);
            return;
        }
        rtt[i] = now_us() - t0;
    }
    uint64_t took = now_us() - start;
    close(fd);
    qsort(rtt, count, sizeof(*rtt), cmp_u64);
    say(ctl, "DONE %u %llu %llu %llu", count, (unsigned long long)(took * 1000 / count),
        (unsigned long long)(rtt[count / 2] * 1000),
        (unsigned long long)(rtt[count * 99 / 100] * 1000));
    free(rtt);
}

static void cmd_shell(int ctl, unsigned port) {
    int l = vsock_listen(SOCK_STREAM, port);
    if (l < 0) {
        say(ctl, "ERR listen on port %u: %s", port, strerror(errno));
        return;
    }
    say(ctl, "READY");
    int fd = accept4(l, NULL, NULL, 0);
    close(l);
    if (fd < 0) {
        say(ctl, "ERR accept: %s", strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
        execl("/bin/sh", "sh", "-i", (char *)NULL);
        _exit(127);
    }
    close(fd);
    int status = 0;
    if (pid > 0)
        waitpid(pid, &status, 0);
    say(ctl, "DONE %d", pid > 0 ? WEXITSTATUS(status) : -1);
}

/* Reads one line from the control connection. Returns its length, or -1. */
static int read_line(int fd, char *line, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        if (c == '\n') {
            line[n] = 0;
            return (int)n;
        }
        line[n++] = c;
    }
    return -1;
}

static void *control(void *arg) {
    int ctl = (int)(intptr_t)arg;
    char line[256];
    while (read_line(ctl, line, sizeof(line)) >= 0) {
        char cmd[16];
        unsigned a = 0, b = 0;
        unsigned long long c = 0;
        int got = sscanf(line, "%15s %u %u %llu", cmd, &a, &b, &c);
        if (got < 1)
            continue;
        fprintf(stderr, "vsock-agent: < %s\n", line);
        if (!strcmp(cmd, "SINK") && got >= 3)
            cmd_sink(ctl, a, b);
        else if (!strcmp(cmd, "SOURCE") && got >= 4)
            cmd_source(ctl, a, b, c);
        else if (!strcmp(cmd, "SEQ") && got >= 3)
            cmd_seq(ctl, a, b);
        else if (!strcmp(cmd, "REFUSED") && got >= 2)
            cmd_refused(ctl, a);
        else if (!strcmp(cmd, "ECHO") && got >= 2)
            cmd_echo(ctl, a);
        else if (!strcmp(cmd, "PING") && got >= 4)
            cmd_ping(ctl, a, b, (unsigned)c);
        else if (!strcmp(cmd, "SHELL") && got >= 2)
            cmd_shell(ctl, a);
        else if (!strcmp(cmd, "HELLO"))
            say(ctl, "HELLO");
        else
            say(ctl, "ERR unknown command: %s", line);
    }
    close(ctl);
    return NULL;
}

int main(void) {
    int l = vsock_listen(SOCK_STREAM, CONTROL_PORT);
    if (l < 0) {
        fprintf(stderr, "vsock-agent: listen on port %d: %s\n", CONTROL_PORT, strerror(errno));
        return 1;
    }
    fprintf(stderr, "vsock-agent: listening on port %d\n", CONTROL_PORT);
    for (;;) {
        int fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "vsock-agent: accept: %s\n", strerror(errno));
            sleep(1);
            continue;
        }
        pthread_t t;
        if (pthread_create(&t, NULL, control, (void *)(intptr_t)fd) != 0) {
            close(fd);
            continue;
        }
        pthread_detach(t);
    }
}
