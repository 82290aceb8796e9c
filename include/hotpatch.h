/*
 * hotpatch.h — describe a patch library for `hotpatch apply`.
 *
 * A patch is a shared library (gcc -shared -fPIC) whose `.hotpatch` section
 * says what it replaces in which image. The section holds strings only (no
 * pointers, so no relocations): one record per macro below.
 *
 *   #include "hotpatch.h"
 *   HOTPATCH_TARGET("fee-server", "");           // image (soname, path or file name), build-id or ""
 *
 *   HOTPATCH_POINTER(long, requests_served);     // filled in with &requests_served in the target
 *   HOTPATCH_ORIGINAL(long, compute_fee, (long)); // callable original: orig_compute_fee(x)
 *
 *   long compute_fee_fixed(long amount) { ... }
 *   HOTPATCH_REPLACE(compute_fee, compute_fee_fixed);
 *
 * Target names are symbol names of the target image (.symtab or .dynsym,
 * static functions and variables included). Where a name is ambiguous, use
 * the _NAMED forms with "file.c:name" or "0xADDRESS" (the address as in the
 * file, before relocation).
 */
#ifndef HOTPATCH_H
#define HOTPATCH_H

#define HOTPATCH__CAT2(a, b) a##b
#define HOTPATCH__CAT(a, b) HOTPATCH__CAT2(a, b)
#define HOTPATCH__STR2(x) #x
#define HOTPATCH__STR(x) HOTPATCH__STR2(x)
#define HOTPATCH__RECORD(text)                                                            \
    __attribute__((section(".hotpatch"), used, aligned(1))) static const char            \
        HOTPATCH__CAT(hotpatch__record_, __COUNTER__)[] = "hotpatch-v1 " text

/* The image this patch is for, and its GNU build-id in hex ("" = any). */
#define HOTPATCH_TARGET(image, build_id) HOTPATCH__RECORD("target " image " " build_id)

/* Every call to `target` goes to `replacement` (a function of this library). */
#define HOTPATCH_REPLACE(target, replacement) HOTPATCH__RECORD("replace " HOTPATCH__STR(target) " " HOTPATCH__STR(replacement))
#define HOTPATCH_REPLACE_NAMED(target, replacement) HOTPATCH__RECORD("replace " target " " HOTPATCH__STR(replacement))

/* Store the address of target symbol `symbol` (function or variable, exported or
 * static) into this library's pointer variable `pointer` before anything runs. */
#define HOTPATCH_REF(symbol, pointer) HOTPATCH__RECORD("ref " HOTPATCH__STR(symbol) " " HOTPATCH__STR(pointer))
#define HOTPATCH_REF_NAMED(symbol, pointer) HOTPATCH__RECORD("ref " symbol " " HOTPATCH__STR(pointer))

/* Store the address of the *original* code of target function `symbol`,
 * callable even while (and after) this patch replaces it. */
#define HOTPATCH_ORIG(symbol, pointer) HOTPATCH__RECORD("orig " HOTPATCH__STR(symbol) " " HOTPATCH__STR(pointer))
#define HOTPATCH_ORIG_NAMED(symbol, pointer) HOTPATCH__RECORD("orig " symbol " " HOTPATCH__STR(pointer))

/*
 * Records for tools (written by `hotpatch build`; C authors use the macros
 * above). The syntax and rules are in crates/hotpatch/src/patchfile/mod.rs:
 *
 *   hotpatch-v1 ref TARGET-SYMBOL POINTER ADDEND
 *       POINTER <- address of TARGET-SYMBOL + ADDEND.
 *   hotpatch-v1 rel64 TARGET-SYMBOL SITE ADDEND BASE
 *       the 8 bytes at SITE <- address of TARGET-SYMBOL + ADDEND - address
 *       of BASE (64-bit, wrapping, little-endian), written before anything
 *       of the patch runs. For -mcmodel=large code whose S@GOTOFF/S@PLTOFF
 *       constants name a target symbol S: BASE is the patch's GOT.
 *
 * ADDEND: decimal or 0x hex, optionally signed ("0", "-4", "0x10"), in the
 * range of a signed 64-bit integer.
 * SITE: a symbol in the patch's .dynsym (global or weak, defined once, not
 * absolute), STT_OBJECT or STT_NOTYPE, of size 8 or 0, whose 8 bytes lie in
 * one PT_LOAD segment; it may be in code. Its 8 bytes must be zero in the
 * file, else the apply is refused and nothing is written.
 * BASE: a symbol in the patch's .dynsym (same rules), STT_FUNC, STT_OBJECT
 * or STT_NOTYPE, any size. GNU ld exports the GOT with
 * -Wl,--defsym,__hotpatch_got=ADDR(.got.plt) (a --defsym equal to
 * _GLOBAL_OFFSET_TABLE_ itself comes out local, not exported: refused).
 * No two records may fill overlapping bytes.
 *
 * HOTPATCH_REL64 writes the record from C, for tests of tools; `addend` is
 * a literal number (it is turned into text, not evaluated).
 */
#define HOTPATCH_REL64(symbol, site, addend, base)                                        \
    HOTPATCH__RECORD("rel64 " HOTPATCH__STR(symbol) " " HOTPATCH__STR(site) " "           \
                     HOTPATCH__STR(addend) " " HOTPATCH__STR(base))

/* Declare `type *name` pointing at target variable `name`:  *name += 1; */
#define HOTPATCH_POINTER(type, name)                                                      \
    __attribute__((visibility("default"))) type *HOTPATCH__CAT(hotpatch_ref_, name);      \
    HOTPATCH_REF(name, HOTPATCH__CAT(hotpatch_ref_, name))
#define HOTPATCH_VAR(name) (*HOTPATCH__CAT(hotpatch_ref_, name))

/* Declare `orig_name`, a pointer to the original function `name`. */
#define HOTPATCH_ORIGINAL(ret, name, params)                                              \
    __attribute__((visibility("default"))) ret(*HOTPATCH__CAT(orig_, name)) params;       \
    HOTPATCH_ORIG(name, HOTPATCH__CAT(orig_, name))

/* Declare `call_name`, a pointer to the target function `name` (which, once
 * patched, runs the newest replacement). */
#define HOTPATCH_FUNCTION(ret, name, params)                                              \
    __attribute__((visibility("default"))) ret(*HOTPATCH__CAT(call_, name)) params;       \
    HOTPATCH_REF(name, HOTPATCH__CAT(call_, name))

#endif
