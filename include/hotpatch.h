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
 * static functions and variables included).
 *
 * Names and macros. A *target* name (the first argument of REPLACE, REF and
 * ORIG, the `name` of POINTER, VAR, ORIGINAL and FUNCTION) is recorded (and
 * pasted into the declared variable's name) exactly as written, never
 * macro-expanded: with `#define counter my_counter` in scope (a header the
 * fixed source shares, or gcc's own `linux` and `unix`, both 1),
 * HOTPATCH_POINTER(long, counter) still looks up `counter` and declares
 * `hotpatch_ref_counter`. Write the name the target's symbol table holds;
 * if the target's source renamed it through a macro, write the renamed one.
 * A *patch-side* name (the replacement of REPLACE, the pointer of REF and
 * ORIG) IS expanded, because it must name the symbol the compiler emits:
 * with `#define fixed fixed_v2`, `long fixed(long)` defines `fixed_v2`, and
 * HOTPATCH_REPLACE(f, fixed) records `fixed_v2`.
 *
 * The _NAMED forms take the target as a string literal, for names C cannot
 * spell or that are ambiguous:
 *   "file.c:name"   the static `name` defined in file.c (from .symtab's FILE
 *                   symbols), when several files define one;
 *   "0xADDRESS"     the symbol at that address as in the file, before
 *                   relocation;
 *   "f.constprop.0", "_ZN3foo3barEv", "krate::m::f"   any other symbol
 *                   name (no spaces): mangled, or a Rust path as demangled.
 *   HOTPATCH_REF_NAMED("server.c:fees_charged", p_fees);
 *
 * Reach target variables through pointers (HOTPATCH_POINTER, HOTPATCH_REF),
 * never by defining them again: a variable defined here is this library's
 * own copy. `hotpatch apply` warns about each variable this library defines
 * with the name of a target variable. A target name that names nothing is
 * refused with near names, other forms of it (mangled / demangled), compiler
 * clones, or the callers it was inlined into.
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
#define HOTPATCH_REPLACE(target, replacement) HOTPATCH__RECORD("replace " #target " " HOTPATCH__STR(replacement))
#define HOTPATCH_REPLACE_NAMED(target, replacement) HOTPATCH__RECORD("replace " target " " HOTPATCH__STR(replacement))

/* Store the address of target symbol `symbol` (function or variable, exported or
 * static) into this library's pointer variable `pointer` before anything runs. */
#define HOTPATCH_REF(symbol, pointer) HOTPATCH__RECORD("ref " #symbol " " HOTPATCH__STR(pointer))
#define HOTPATCH_REF_NAMED(symbol, pointer) HOTPATCH__RECORD("ref " symbol " " HOTPATCH__STR(pointer))

/* Store the address of the *original* code of target function `symbol`,
 * callable even while (and after) this patch replaces it. */
#define HOTPATCH_ORIG(symbol, pointer) HOTPATCH__RECORD("orig " #symbol " " HOTPATCH__STR(pointer))
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
    HOTPATCH__RECORD("rel64 " #symbol " " HOTPATCH__STR(site) " "                        \
                     HOTPATCH__STR(addend) " " HOTPATCH__STR(base))

/* The declaring macros below paste `name` with ## and stringify it with #
 * in their own bodies: an argument next to ## or # is never expanded, so
 * the record names the target `name` as written and the declared variable
 * is `hotpatch_ref_name` / `orig_name` / `call_name` whatever `name` is
 * #defined to. (Passing `name` on to another macro would expand it first.)
 * The declared variable is stringified through HOTPATCH__STR, like any
 * patch-side name, so the record and the declaration agree. */

/* Declare `type *hotpatch_ref_name` pointing at target variable `name`:
 * HOTPATCH_VAR(name) += 1; */
#define HOTPATCH_POINTER(type, name)                                                      \
    __attribute__((visibility("default"))) type *hotpatch_ref_##name;                    \
    HOTPATCH__RECORD("ref " #name " " HOTPATCH__STR(hotpatch_ref_##name))
#define HOTPATCH_VAR(name) (*hotpatch_ref_##name)

/* Declare `orig_name`, a pointer to the original function `name`. */
#define HOTPATCH_ORIGINAL(ret, name, params)                                              \
    __attribute__((visibility("default"))) ret(*orig_##name) params;                     \
    HOTPATCH__RECORD("orig " #name " " HOTPATCH__STR(orig_##name))

/* Declare `call_name`, a pointer to the target function `name` (which, once
 * patched, runs the newest replacement). */
#define HOTPATCH_FUNCTION(ret, name, params)                                              \
    __attribute__((visibility("default"))) ret(*call_##name) params;                     \
    HOTPATCH__RECORD("ref " #name " " HOTPATCH__STR(call_##name))

#endif
