from django.urls import path
from shop import views

urlpatterns = [
    path("", views.hello, name="hello"),
    path("items/", views.items, name="items"),
]
