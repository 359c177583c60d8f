/* Entry: the VMM set rsp (STACK_TOP) and loaded the image with zeroed bss. */
    .section .text.start, "ax"
    .globl _start
_start:
    and $-16, %rsp
    call driver_main
1:  hlt
    jmp 1b
    .section .note.GNU-stack, "", @progbits
