/* LD_PRELOAD for dicom_ingest.py: dcmtk storescp with the durability vip-agent's spool gives
   each object. Every regular file written through stdio is fsynced before fclose returns,
   then its folder is fsynced (storescp writes each object under its final name, so the
   folder's fsync is what makes the new name durable). storescp closes the file before it
   sends the C-STORE response, so both fsyncs happen before the sender hears success. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

int fclose(FILE *f) {
    static int (*real)(FILE *) = 0;
    if (!real) real = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    int fd = fileno(f);
    int flags = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
    struct stat st;
    if (flags != -1 && (flags & O_ACCMODE) != O_RDONLY && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        char link[64], path[PATH_MAX];
        fflush(f);
        fsync(fd);
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        if (n > 0) {
            path[n] = 0;
            int dir = open(dirname(path), O_RDONLY);
            if (dir >= 0) {
                fsync(dir);
                close(dir);
            }
        }
    }
    return real(f);
}
