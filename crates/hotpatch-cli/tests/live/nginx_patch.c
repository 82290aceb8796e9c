/*
 * A patch of the Debian package's nginx (/usr/sbin/nginx: stripped, no
 * padding, linked with -E for dynamic modules, so its ngx_* functions are
 * in .dynsym). The content phase's checker, `ngx_http_core_content_phase`,
 * is only ever called through the phase engine's function pointers; the
 * replacement refuses every request with 403 Forbidden (nginx's own error
 * page), as an emergency fix closing a server would.
 *
 * BUILD_ID is the build-id of the nginx it was made for (given on the
 * compiler's command line).
 */
#include "hotpatch.h"

HOTPATCH_TARGET("nginx", BUILD_ID);
HOTPATCH_FUNCTION(void, ngx_http_finalize_request, (void *, long));

long content_phase_closed(void *r, void *ph) {
    (void)ph;
    call_ngx_http_finalize_request(r, 403);
    return 0; /* NGX_OK: the request is finished */
}
HOTPATCH_REPLACE(ngx_http_core_content_phase, content_phase_closed);
