/* LD_PRELOAD for dicom_ingest.py's diagnostic round only: fsync and fdatasync return at once
   without writing anything. It shows what vip-agent's receiving costs apart from the
   durability it gives every object, next to dcmtk storescp as shipped (which does not
   fsync). Never for real use: an object acknowledged under it can be lost in a power cut. */
#define _GNU_SOURCE
int fsync(int fd) { (void)fd; return 0; }
int fdatasync(int fd) { (void)fd; return 0; }
